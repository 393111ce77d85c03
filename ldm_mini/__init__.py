"""ldm_mini: Latent Diffusion Models (Rombach et al., CVPR 2022), from scratch, one concept per file."""
