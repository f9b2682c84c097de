"""Review galleries: static HTML pages of samples with their scores, side-by-side comparisons, reviewer labels
exported as JSONL, and plots of training runs."""

from align_diffusion.gallery.page import build_comparison, build_gallery, read_records, safe_filename
from align_diffusion.gallery.run import build_run_page

__all__ = ["build_comparison", "build_gallery", "build_run_page", "read_records", "safe_filename"]
