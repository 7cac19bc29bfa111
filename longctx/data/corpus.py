"""Where documents come from. `builtin` is the English text that ships inside CPython
(`pydoc_data.topics`: the language reference's topic pages), so a fresh machine trains without a
download.
"""

from collections.abc import Iterator


def builtin_documents() -> list[str]:
    """The built-in corpus: one document per topic page, in a fixed order."""
    from pydoc_data import topics

    return [topics.topics[name] for name in sorted(topics.topics)]


def iter_documents(source: str) -> Iterator[str]:
    if source == "builtin":
        yield from builtin_documents()
        return
    raise ValueError(f"data.source {source!r} is not supported; use data.source=builtin")
