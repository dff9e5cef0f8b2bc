"""Knowledge graph data: the container, built-in datasets, the MKGformer loader."""
