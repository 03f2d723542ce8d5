"""Demo evaluator: a small CNN judge (classifier.py), attribute accuracies and FD-demo (metrics.py), and the
`lcmtool eval` engine that reads folders of generated PNGs with their prompts (engine.py)."""
