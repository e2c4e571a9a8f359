"""Built-in grouping backends. Each registers through the ``elsa`` entry-point group."""
