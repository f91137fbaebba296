"""mlx_qwenmoe."""
