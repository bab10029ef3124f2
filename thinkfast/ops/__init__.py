from .ssd import ssd_chunked, ssd_matrix, ssd_scan, ssd_sequential, ssd_step

__all__ = ["ssd_chunked", "ssd_scan", "ssd_step", "ssd_matrix", "ssd_sequential"]
