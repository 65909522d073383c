"""clipfuse.cli: the `clipfuse` command line (application layer).

main (entry point: the group with every command registered), group (the click group and its
one-line errors), build (commands that make and examine engines), run (commands that run and
serve them), present (every text the CLI shows a person).
"""
