"""`herd eval`: evaluations of a model (niah.py: needle in a haystack; harness.py + lm.py: lm-evaluation-harness
tasks in process or through a server, tasks/: herd's local task suite; humaneval.py: HumanEval pass@1 in the
sandbox; perplexity.py: sliding-window perplexity of a text file)."""
