//! The layout of every type and constant shared with the C programs, as data.
//!
//! [`crate::SHARED_STRUCTS`] and [`crate::SHARED_CONSTANTS`] are the single
//! source of truth for the two sides:
//!
//! - Rust: `shared_struct!` asserts at compile time that each listed field
//!   sits at the offset written next to it, that the fields cover the struct
//!   byte for byte (padding is always a named field), and the struct's size.
//!   A field that moves, grows or is left out of the list fails the build of
//!   this crate.
//! - C: the agent's build script (`exporter/build.rs`) turns both tables into
//!   `<header>.layout.h` files of `_Static_assert`s, one per header named here,
//!   which the header includes. The numbers come from the compiled Rust types,
//!   so clang refuses a C struct whose field names, offsets or sizes differ
//!   from its Rust twin. The build script also refuses a struct or an `FS_`
//!   constant in those headers that has no entry here.

use core::mem::size_of;

/// One field of a shared struct; the name is the same in C and in Rust.
#[derive(Clone, Copy, Debug)]
pub struct FieldLayout {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
}

/// A `#[repr(C)]` struct with a twin in a C header under `ebpf/bpf/`.
#[derive(Clone, Copy, Debug)]
pub struct StructLayout {
    /// Header (in `ebpf/bpf/`) that defines the C twin.
    pub header: &'static str,
    /// The C twin's tag: `struct <c_name>`.
    pub c_name: &'static str,
    pub rust_name: &'static str,
    pub size: usize,
    pub align: usize,
    /// Every field, in offset order, padding included.
    pub fields: &'static [FieldLayout],
}

/// A numeric constant (`#define` or enumerator) with the same value on both sides.
#[derive(Clone, Copy, Debug)]
pub struct ConstantLayout {
    /// Header (in `ebpf/bpf/`) that defines the C name.
    pub header: &'static str,
    pub c_name: &'static str,
    /// The Rust expression of the value, as written in the table.
    pub rust_name: &'static str,
    pub value: u64,
}

/// Size of the field a closure projects, without a value of the struct.
#[doc(hidden)]
pub const fn field_size<T, F>(_project: fn(T) -> F) -> usize {
    size_of::<F>()
}

/// Whether `fields` start at 0, follow each other without gap or overlap,
/// and end at `size`: no byte of the struct is left out of the list.
#[doc(hidden)]
pub const fn covers_every_byte(fields: &[FieldLayout], size: usize) -> bool {
    let mut end = 0;
    let mut i = 0;
    while i < fields.len() {
        if fields[i].offset != end {
            return false;
        }
        end += fields[i].size;
        i += 1;
    }
    end == size
}

/// Describes a struct shared with C and asserts its Rust layout.
///
/// ```text
/// shared_struct!("fleetsnitch.h", fs_config = Config, size 8 {
///     generation @ 0,
///     _pad @ 4,
/// })
/// ```
///
/// lists every field with its offset, in order. The C names are the Rust
/// names; the expression is a [`StructLayout`].
macro_rules! shared_struct {
    ($header:literal, $c_name:ident = $rust:ident, size $size:literal {
        $($field:ident @ $offset:literal),+ $(,)?
    }) => {{
        $(
            const _: () = assert!(
                ::core::mem::offset_of!($rust, $field) == $offset,
                concat!(
                    stringify!($rust), "::", stringify!($field), " is no longer at offset ",
                    stringify!($offset), ": change struct ", stringify!($c_name), " in ebpf/bpf/",
                    $header, " the same way, then the offsets listed in ebpf/src/lib.rs"
                )
            );
        )+
        const _: () = assert!(
            ::core::mem::size_of::<$rust>() == $size,
            concat!(
                stringify!($rust), " is no longer ", stringify!($size), " bytes: change struct ",
                stringify!($c_name), " in ebpf/bpf/", $header,
                " the same way, then the size listed in ebpf/src/lib.rs"
            )
        );
        const FIELDS: &[$crate::layout::FieldLayout] = &[$(
            $crate::layout::FieldLayout {
                name: stringify!($field),
                offset: ::core::mem::offset_of!($rust, $field),
                size: $crate::layout::field_size(|value: $rust| value.$field),
            },
        )+];
        const _: () = assert!(
            $crate::layout::covers_every_byte(FIELDS, ::core::mem::size_of::<$rust>()),
            concat!(
                "the fields listed for ", stringify!($rust), " in ebpf/src/lib.rs leave a gap, ",
                "overlap or are out of order: list every field, padding included, by offset"
            )
        );
        $crate::layout::StructLayout {
            header: $header,
            c_name: stringify!($c_name),
            rust_name: stringify!($rust),
            size: ::core::mem::size_of::<$rust>(),
            align: ::core::mem::align_of::<$rust>(),
            fields: FIELDS,
        }
    }};
}

/// Describes a constant shared with C: `shared_constant!("dns.h", FS_DNS_PAYLOAD = DNS_PAYLOAD)`.
macro_rules! shared_constant {
    ($header:literal, $c_name:ident = $value:expr) => {
        $crate::layout::ConstantLayout {
            header: $header,
            c_name: stringify!($c_name),
            rust_name: stringify!($value),
            value: $value as u64,
        }
    };
}
