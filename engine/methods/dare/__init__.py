"""DARE: drop and rescale task vectors before merging them (Yu et al., 2024)."""
