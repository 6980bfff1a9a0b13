"""ComfyUI's low-VRAM loading on a machine without a GPU, for the ComfyUI tier."""


def simulate_no_vram(monkeypatch):
    """ComfyUI's memory accounting as on a GPU started with --novram: every weight stays on the offload device and
    each layer casts its weight to the compute device when it runs (the test machine's "GPU" is its CPU). ComfyUI
    must be imported; ``monkeypatch`` undoes it after the test."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)
