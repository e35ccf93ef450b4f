//! GIF through the `gif` crate with palette indices, so that the first frame can be laid on
//! its canvas and looked up exactly as Pillow does (`image` composites onto transparent black
//! instead).

use std::io::Cursor;

use gif::{ColorOutput, DecodeOptions};
use image::RgbImage;

use super::{corrupt, rgb_image, ImageFormat, SizeCheck};
use crate::preprocess::PreprocessError;

const FORMAT: ImageFormat = ImageFormat::Gif;

pub(super) fn decode(bytes: &[u8], check: SizeCheck<'_>) -> Result<RgbImage, PreprocessError> {
    let mut options = DecodeOptions::new();
    options.set_color_output(ColorOutput::Indexed);
    let mut decoder = options
        .read_info(Cursor::new(bytes))
        .map_err(|e| corrupt(FORMAT, e))?;
    let screen = (u32::from(decoder.width()), u32::from(decoder.height()));
    // Only the frame's descriptor is read here; its pixels wait for the size check.
    let frame = decoder
        .next_frame_info()
        .map_err(|e| corrupt(FORMAT, e))?
        .ok_or_else(|| corrupt(FORMAT, "no image in the file"))?;
    let (left, top) = (usize::from(frame.left), usize::from(frame.top));
    let (frame_w, frame_h) = (usize::from(frame.width), usize::from(frame.height));
    // Pillow grows the canvas to hold a first frame that overhangs the logical screen. The
    // check covers the frame too, which lies inside the grown canvas.
    let width = screen.0.max((left + frame_w) as u32);
    let height = screen.1.max((top + frame_h) as u32);
    let pixels = check.pixels(FORMAT, width.into(), height.into())?;
    // Pillow's canvas starts as the transparent index if the frame has one, else index 0.
    let background = frame.transparent.unwrap_or(0);
    let mut canvas = vec![background; pixels];
    // The frame's own indices live only until they are on the canvas, so that they are gone
    // before the RGB image is made.
    {
        let mut indices = vec![0u8; frame_w * frame_h];
        decoder
            .read_into_buffer(&mut indices)
            .map_err(|e| corrupt(FORMAT, e))?;
        if frame_w > 0 {
            let rows = canvas.chunks_exact_mut(width as usize).skip(top);
            for (row, src) in rows.zip(indices.chunks_exact(frame_w)) {
                row[left..left + frame_w].copy_from_slice(src);
            }
        }
    }
    let palette = decoder.palette().map_err(|e| corrupt(FORMAT, e))?;
    // Indices past the end of the palette are black in Pillow's zero-filled palette.
    let mut rgb = Vec::with_capacity(pixels * 3);
    for &i in &canvas {
        let at = usize::from(i) * 3;
        rgb.extend_from_slice(palette.get(at..at + 3).unwrap_or(&[0; 3]));
    }
    Ok(rgb_image(width, height, rgb))
}
