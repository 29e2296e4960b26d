"""The data path: data specs -> datasets -> transforms and loaders (CPU or device-side augmentation)."""
