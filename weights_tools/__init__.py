"""Converters from published Latent Diffusion weights to ldm_mini's one-file format.

python -m weights_tools.convert SOURCE OUT.safetensors     diffusers folder or CompVis .ckpt
python -m weights_tools.download REPO_ID [OUT]             hub download + conversion
python -m weights_tools.info FILE                          what a converted file holds
"""
