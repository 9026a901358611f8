"""Log lines as a damaged log holds them, for the parsers' hypothesis tests: a real line
kept, cut, with characters inserted, deleted or replaced, or garbage."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st


def mangled(real: Sequence[str], garbage_tails: Sequence[str] = ("",)) -> st.SearchStrategy[str]:
    """One of ``real`` as a damaged log may hold it; garbage ends with one of
    ``garbage_tails`` (what makes a parser take a line for one of its own)."""

    @st.composite
    def line_of(draw: st.DrawFn) -> str:
        line = draw(st.sampled_from(real))
        how = draw(st.sampled_from(["keep", "cut", "insert", "delete", "replace", "garbage"]))
        if how == "garbage":
            return draw(st.text(max_size=300)) + draw(st.sampled_from(garbage_tails))
        if how == "keep":
            return line
        at = draw(st.integers(0, len(line)))
        if how == "cut":
            return line[:at]
        if how == "delete":
            return line[:at] + line[at + draw(st.integers(1, 20)):]
        chunk = draw(st.text(min_size=1, max_size=12))
        if how == "insert":
            return line[:at] + chunk + line[at:]
        return line[:at] + chunk + line[at + len(chunk):]

    return line_of()
