from .boot import launch

launch()
