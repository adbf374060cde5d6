"""The method: surrogates, the SUGAR op, its saved-derivative forms, fused eager kernels, the torch.compile lowering."""
