"""longctx: a training runtime for long-context language models.

Subpackages: `longctx.kernels` (token-mixer ops), `longctx.parallel` (context parallelism),
`longctx.model`, `longctx.data`, `longctx.train`. Importing `longctx` itself is cheap and needs only
torch; the CLI is `longctx` (or `python -m longctx`).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `longctx.generate` without importing the model stack on `import longctx`.
    if name == "generate":
        from longctx.generation import generate

        return generate
    raise AttributeError(f"module 'longctx' has no attribute {name!r}")
