"""The daemon's core: job manager, aggregator, store, event loop and control server."""
