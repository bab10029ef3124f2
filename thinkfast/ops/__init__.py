from .ssd import ssd_chunked, ssd_matrix, ssd_sequential, ssd_step

__all__ = ["ssd_chunked", "ssd_step", "ssd_matrix", "ssd_sequential"]
