"""Layer 4, what a run writes: the table files and their headers (``tables``), the report folder
(``writer``), the published numbers set beside ours (``published``) and the plots."""
