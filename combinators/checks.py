"""Compatibility module: checked mode lives in :mod:`combinators.core.checked`."""

from combinators.core.checked import (
    check_log_weight,
    check_loss,
    check_sites,
    checked,
    is_checked,
)

__all__ = ["check_log_weight", "check_loss", "check_sites", "checked", "is_checked"]
