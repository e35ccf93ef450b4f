use image::RgbImage;

/// Scales to 0..=1 and standardises per channel, returning CHW.
///
/// The operations and their order are torchvision's (ToTensor divides by 255, Normalize
/// subtracts the mean then divides by the std, all in f32), so the result is bit-identical to
/// upstream's tensor; multiplying by precomputed reciprocals would not be.
pub fn normalize_chw(image: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = image.width() as usize * image.height() as usize;
    let mut out = vec![0.0f32; 3 * plane];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in image.as_raw().chunks_exact(3).enumerate() {
        r[i] = (f32::from(px[0]) / 255.0 - mean[0]) / std[0];
        g[i] = (f32::from(px[1]) / 255.0 - mean[1]) / std[1];
        b[i] = (f32::from(px[2]) / 255.0 - mean[2]) / std[2];
    }
    out
}
