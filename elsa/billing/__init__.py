"""Charge-back: rates, prime-time schedule and bills (docs/billing.md)."""
