"""How the bench sections print figures: thousands spaced, a median with
its range."""

import statistics


def num(v, dec):
    """`v` with `dec` decimals and a space between thousands; `–` for None."""
    return "–" if v is None else f"{v:,.{dec}f}".replace(",", " ")


def spread(v, dec):
    """The median of `v`, then its range when there is more than one."""
    if not v:
        return "–"
    text = num(statistics.median(v), dec)
    if len(v) > 1:
        text += f" ({num(min(v), dec)}–{num(max(v), dec)})"
    return text
