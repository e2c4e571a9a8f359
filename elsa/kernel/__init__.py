"""Adapters to the kernel's interfaces: each converts one interface's bytes into
plain values and keeps the kernel's names inside it (docs/kernel.md)."""
