"""seqjax.ops is portable JAX: no module imports flax, and only `seqjax.ops.backend` reaches the CPU kernels."""

import ast
import os
import pathlib
import subprocess
import sys

import seqjax.ops

OPS = pathlib.Path(seqjax.ops.__file__).parent


def _modules():
  for path in sorted(OPS.rglob("*.py")):
    parts = path.relative_to(OPS.parent.parent).with_suffix("").parts
    yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path):
  """Every module name an `import` / `from ... import` statement of the file names (at any depth)."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.module
      yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_no_module_under_ops_imports_flax_directly():
  offenders = {name: sorted({m for m in _imported(path) if m == "flax" or m.startswith("flax.")})
               for path, name in _modules()}
  assert not {k: v for k, v in offenders.items() if v}


def test_only_the_backend_imports_the_cpu_kernels():
  users = {name for path, name in _modules()
           if any(m == "seqjax.cpu_kernels" or m.startswith("seqjax.cpu_kernels.") for m in _imported(path))}
  assert users == {"seqjax.ops.backend"}


def test_every_ops_module_imports_with_flax_blocked():
  """Transitive imports too: each module imported in a process where importing flax fails."""
  names = [name for _, name in _modules()]
  code = ("import importlib, sys\n"
          "class Block:\n"
          "  def find_spec(self, name, path=None, target=None):\n"
          "    if name == 'flax' or name.startswith('flax.'):\n"
          "      raise ImportError(f'flax is blocked: {name}')\n"
          "sys.meta_path.insert(0, Block())\n"
          f"for name in {names!r}:\n"
          "  importlib.import_module(name)\n"
          "assert not any(m == 'flax' or m.startswith('flax.') for m in sys.modules)\n"
          "print(len(sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, check=False)
  assert out.returncode == 0, out.stderr
