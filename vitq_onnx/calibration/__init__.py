"""Calibration in PyTorch: quant points on the timm model, quantizer fitting, methods -> recipe."""
