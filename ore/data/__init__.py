"""Data: image records (VOC and COCO), class splits and task roles, datasets, samplers and
transforms, exemplar selection, the toy world, image folders and Fashion-MNIST."""
