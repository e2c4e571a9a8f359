"""Central store: a site-wide PostgreSQL that every node ships its records to."""
