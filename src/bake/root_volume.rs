//! `builder.root_volume_gib`: the builder's root volume, resized at launch.
//!
//! The image made from the builder keeps that size (CreateImage snapshots the
//! volume as it is), so instances launched from the new AMI get it too.

use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice, Image};

/// Pure: the block device mapping that gives a builder launched from `base` a
/// root volume of `gib` GiB, or why it cannot (one line, naming the fix).
///
/// Only the size is overridden; the volume type, IOPS and encryption come from
/// the base image's mapping, as EC2 does for a partial override. The volume is
/// deleted with the builder whatever the base image says, so a terminated
/// builder leaves no volume behind.
pub fn mapping(base: &Image, gib: u32) -> Result<BlockDeviceMapping, String> {
    let ami = base.image_id().unwrap_or("the base AMI");
    let Some(device) = base.root_device_name() else {
        return Err(format!(
            "base AMI {ami} names no root device; remove root_volume_gib to keep its size"
        ));
    };
    let root = base
        .block_device_mappings()
        .iter()
        .find(|m| m.device_name() == Some(device))
        .and_then(|m| m.ebs());
    let Some(ebs) = root else {
        return Err(format!(
            "base AMI {ami} has no EBS root volume at {device} (instance store); \
             remove root_volume_gib or use an EBS-backed base image"
        ));
    };
    if let Some(size) = ebs.volume_size() {
        if i64::from(gib) < i64::from(size) {
            return Err(format!(
                "{gib} GiB is smaller than the {size} GiB root volume of base AMI {ami}; \
                 set it to at least {size}, or remove it to keep the base size"
            ));
        }
    }
    Ok(BlockDeviceMapping::builder()
        .device_name(device)
        .ebs(
            EbsBlockDevice::builder()
                .volume_size(gib as i32)
                .delete_on_termination(true)
                .build(),
        )
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::DeviceType;

    fn base(root: Option<&str>, mappings: &[(&str, Option<i32>)]) -> Image {
        let mut b = Image::builder()
            .image_id("ami-12345678")
            .root_device_type(DeviceType::Ebs);
        if let Some(r) = root {
            b = b.root_device_name(r);
        }
        for (device, size) in mappings {
            let mut m = BlockDeviceMapping::builder().device_name(*device);
            if let Some(size) = size {
                m = m.ebs(
                    EbsBlockDevice::builder()
                        .volume_size(*size)
                        .snapshot_id("snap-1")
                        .delete_on_termination(false)
                        .build(),
                );
            }
            b = b.block_device_mappings(m.build());
        }
        b.build()
    }

    #[test]
    fn resizes_the_root_device_and_deletes_it_with_the_builder() {
        let image = base(
            Some("/dev/sda1"),
            &[("/dev/sdb", Some(100)), ("/dev/sda1", Some(8))],
        );
        let m = mapping(&image, 16).unwrap();
        assert_eq!(m.device_name(), Some("/dev/sda1"));
        let ebs = m.ebs().unwrap();
        assert_eq!(ebs.volume_size(), Some(16));
        assert_eq!(ebs.delete_on_termination(), Some(true));
        assert_eq!(ebs.volume_type(), None, "the base image's type is kept");
        assert_eq!(
            mapping(&image, 8).unwrap().ebs().unwrap().volume_size(),
            Some(8),
            "the base size itself is allowed"
        );
    }

    #[test]
    fn refuses_a_size_below_the_base_image_naming_the_minimum() {
        let e = mapping(&base(Some("/dev/sda1"), &[("/dev/sda1", Some(8))]), 4).unwrap_err();
        assert!(
            e.contains("4 GiB is smaller than the 8 GiB root volume of base AMI ami-12345678")
                && e.contains("at least 8"),
            "{e}"
        );
    }

    #[test]
    fn refuses_a_base_image_without_an_ebs_root() {
        let e = mapping(&base(Some("/dev/sda1"), &[("/dev/sda1", None)]), 16).unwrap_err();
        assert!(e.contains("no EBS root volume at /dev/sda1"), "{e}");
        let e = mapping(&base(None, &[]), 16).unwrap_err();
        assert!(e.contains("names no root device"), "{e}");
    }
}
