"""Built-in accounting-source plugins (installed as the ``elsa_plugins`` package).

Each registers through the ``elsa`` entry-point group, exactly like a third party's.
"""
