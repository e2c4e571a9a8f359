"""The daemon's core: kernel adapters, job manager, store, event loop."""
