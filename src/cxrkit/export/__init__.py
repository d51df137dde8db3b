"""Exported models: ONNX files with their preprocessing metadata, usable without cxrkit."""
