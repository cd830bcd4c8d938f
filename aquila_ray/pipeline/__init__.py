"""The EfficientScale stage graph; growth and upcycling as Ray tasks between the training stages."""
