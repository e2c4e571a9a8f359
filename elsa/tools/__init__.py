"""Developer tools: generators for the man pages, bash completion and default config.

Run ``python3 -m elsa.tools.gendocs`` (or ``packaging/gen-docs``) after changing
an argument parser or a config option; ``--check`` fails when a committed file
has drifted from what the code would generate (the tests run it).
"""
