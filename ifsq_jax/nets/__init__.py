"""Frozen pretrained networks (pure functions of their params): LPIPS (VGG16, AlexNet)."""
