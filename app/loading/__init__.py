"""Getting models ready to serve: backend selection, the export cache and its lock, the export
child, remembered failed exports and the memory check (`loader`), and `engine_loader.load_engine`.

This package may import `app.engine` (it builds runners); `app.engine` never imports this one
(tests/app/test_layout.py). Kept empty so `python -m app.loading.export_child` imports nothing else.
"""
