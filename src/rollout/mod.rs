//! Rolling an auto-scaling group onto an image by replacing its instances.
