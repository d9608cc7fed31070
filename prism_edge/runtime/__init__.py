"""Per-device execution, the communicators and their byte ledger, and the in-process simulator."""
