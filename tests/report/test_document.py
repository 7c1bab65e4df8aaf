"""Training times and parameter counts in the report: short, human-readable, a dash when unknown."""

from __future__ import annotations

from microseg.report.document import fmt_params, fmt_seconds


def test_formatting():
    assert fmt_seconds(None) == "—" and fmt_seconds(12.34) == "12.3 s"
    assert fmt_seconds(119.6) == "2 min 00 s" and fmt_seconds(3725) == "1 h 02 min"
    assert fmt_params(None) == "—" and fmt_params(950) == "950" and fmt_params(31_000) == "31.00 k"
