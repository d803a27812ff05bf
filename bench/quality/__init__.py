"""The merge-quality benchmark: small honest tasks, a tiny CLIP, task vectors."""
