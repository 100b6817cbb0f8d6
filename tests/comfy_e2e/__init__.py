"""End-to-end tests on real ComfyUI servers (marker: comfy)."""
