"""Per-channel input statistics of the datasets the repo reads (ImageNet's come from timm), shared by the data
pipeline and by models whose default config names a dataset (the CIFAR ResNets)."""
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,) * 3, (0.3530,) * 3
