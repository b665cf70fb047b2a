"""The finding codes the auditor reports and the codes the reports describe are one list."""

from kvmpfn.audit import CODES as AUDIT_CODES
from kvmpfn.audit.recorded import CODES as RECORDED_CODES
from kvmpfn.report.codes import CODES as REPORT_CODES


def test_every_finding_code_has_a_rule_and_nothing_else_does():
    assert set(AUDIT_CODES) == set(REPORT_CODES)


def test_recorded_codes_are_finding_codes():
    assert set(RECORDED_CODES) <= set(AUDIT_CODES)
