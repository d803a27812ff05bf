"""TSV-M: task singular vectors, merged (Gargiulo et al., 2025)."""
