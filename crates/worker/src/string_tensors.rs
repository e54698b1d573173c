//! ONNX string tensors as bytes. ONNX Runtime keeps a string tensor's elements as C++
//! `std::string`s, which hold any bytes, NUL included; `ort`'s safe API writes them
//! from NUL-terminated copies of UTF-8 text and reads them back only as UTF-8
//! `String`s. Here they are written and read as bytes through ONNX Runtime's C API
//! (`GetResizedStringTensorElementBuffer`, `GetStringTensorContent`): the only
//! `unsafe` code of the worker, each block with its reasons.
#![allow(unsafe_code)]

use std::ffi::CStr;

use ort::{
    AsPointer,
    value::{DynValue, Tensor, Utf8Data},
};

/// An empty element, what `ort` creates the tensor with before the bytes go in.
#[derive(Debug, Clone, Copy)]
struct Empty;

impl Utf8Data for Empty {
    fn as_utf8_bytes(&self) -> &[u8] {
        &[]
    }
}

/// A string tensor of `shape` holding `elements` (row-major), byte for byte.
pub fn write(shape: Vec<i64>, elements: &[Vec<u8>]) -> Result<DynValue, String> {
    let empties = vec![Empty; elements.len()];
    let mut tensor = Tensor::from_string_array((shape, &empties[..]))
        .map_err(|e| e.to_string())?
        .into_dyn();
    let api = ort::api();
    let value = tensor.ptr_mut();
    for (index, element) in elements.iter().enumerate() {
        if element.is_empty() {
            continue;
        }
        let mut buffer: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: `value` is the string tensor just created, owned by `tensor` and not
        // shared; `index` is below its element count (one element per entry of
        // `elements`, which `ort` checked against the shape); `buffer` is a valid place
        // for the pointer ONNX Runtime returns.
        status(unsafe {
            (api.GetResizedStringTensorElementBuffer)(value, index, element.len(), &mut buffer)
        })?;
        if buffer.is_null() {
            return Err(format!(
                "string element {index}: ONNX Runtime gave no buffer"
            ));
        }
        // SAFETY: ONNX Runtime resized element `index` to `element.len()` bytes and
        // `buffer` points at them; nothing else touches the tensor meanwhile, and the
        // source is a distinct Rust allocation of that length.
        unsafe {
            std::ptr::copy_nonoverlapping(element.as_ptr(), buffer.cast::<u8>(), element.len());
        }
    }
    Ok(tensor)
}

/// The `count` elements of string tensor `value`, as bytes.
pub fn read(value: &DynValue, count: usize) -> Result<Vec<Vec<u8>>, String> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let api = ort::api();
    let tensor = value.ptr();
    let mut total = 0usize;
    // SAFETY: `tensor` is the live `OrtValue` that `value` owns and lends us for this
    // call; the caller has checked it is a string tensor; `total` is a valid place for
    // the length.
    status(unsafe { (api.GetStringTensorDataLength)(tensor, &mut total) })?;
    let mut content = vec![0u8; total];
    let mut offsets = vec![0usize; count];
    // SAFETY: as above; `content` has room for the `total` bytes ONNX Runtime just
    // reported and `offsets` for one offset per element (`count` is the tensor's
    // element count, from its shape), the lengths passed with them.
    status(unsafe {
        (api.GetStringTensorContent)(
            tensor,
            content.as_mut_ptr().cast(),
            total,
            offsets.as_mut_ptr(),
            count,
        )
    })?;
    let mut elements = Vec::with_capacity(count);
    for (i, &start) in offsets.iter().enumerate() {
        let end = offsets.get(i + 1).copied().unwrap_or(total);
        let element = content.get(start..end).ok_or_else(|| {
            format!("string element {i}: offsets {start}..{end} past {total} bytes")
        })?;
        elements.push(element.to_vec());
    }
    Ok(elements)
}

/// Ok for a null status; else its message (and the status released).
fn status(status: ort::sys::OrtStatusPtr) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: `status` is a non-null status ONNX Runtime just returned to us: its
    // message is a NUL-terminated string it owns until the status is released, which
    // happens once, below, after the message is copied.
    let message = unsafe { CStr::from_ptr((api.GetErrorMessage)(status.0)) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: released once, and not used after.
    unsafe { (api.ReleaseStatus)(status.0) };
    Err(message)
}
