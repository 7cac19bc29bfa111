"""longctx: a training runtime for long-context language models.

Subpackages: `longctx.kernels` (token-mixer ops), `longctx.parallel` (context parallelism),
`longctx.model`, `longctx.data`, `longctx.train`. Importing `longctx` itself is cheap and needs only
torch; the CLI is `longctx` (or `python -m longctx`).
"""

__version__ = "0.1.0"

import os as _os

# From a source tree without installing (`PYTHONPATH=. python3 -m longctx check`, how `make gpu-check`
# runs on a GPU machine's own Python): the subpackages installed as longctx.kernels / .parallel /
# .bench live at the top of the repository, so the repository root is searched too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "aot.py")) and _root not in __path__:
    __path__.append(_root)


def __getattr__(name: str):
    # `longctx.generate` without importing the model stack on `import longctx`.
    if name == "generate":
        from longctx.generation import generate

        return generate
    raise AttributeError(f"module 'longctx' has no attribute {name!r}")
