//! QEMU-exact validation of command arguments against static schema tables,
//! run before serde decodes the arguments into typed structs.
//!
//! Behaviour of QEMU's QObject input visitor (`qapi/qobject-input-visitor.c`,
//! `qapi/qapi-visit-core.c`), checked against QEMU 10.0.2:
//!
//! * Members are visited in schema order; the first missing or mistyped one
//!   wins. Unknown members of a struct are reported after all its declared
//!   members were visited (before the parent's next member). Of several
//!   unknown members we name the first in input order (QEMU: hash order).
//! * Missing, type and unknown-member errors use the full name:
//!   `addr.data.path`, `enable[0]`.
//! * Range and enum errors ("Parameter 'x' expects uint32_t", "Parameter 'x'
//!   does not accept value 'y'") use the bare member name, and `null` for a
//!   list element: QEMU says "Parameter 'null' does not accept value 'foo'"
//!   for `{"enable": ["foo"]}`.
//! * A present member is checked even if optional, so an explicit `null`
//!   fails unless the type is [`ArgType::Any`].
//! * Integer slots take integers only (`1.0` is "expected: integer"). The
//!   unsigned ones are read as uint64 first: a non-integer (string, float)
//!   is "Parameter 'x' expects uint64" (full name), and a negative integer
//!   is accepted and wraps to 2^64 + n, "for backward compatibility" says
//!   QEMU; uint8/16/32 then reject it by range. [`normalize`] applies that
//!   wrap so serde can decode such values into `u64`.
//! * A flat union ([`Union`], e.g. `BlockdevOptions`) is one struct: its
//!   base members in order (the discriminator among them), then the members
//!   of the variant the discriminator selects, then unexpected members of
//!   either.
//! * An alternate ([`Alternate`], e.g. `BlockdevRef`) picks its branch by the
//!   JSON type of the value; a value of no branch's type is "Invalid
//!   parameter type for 'file', expected: BlockdevRef" (the alternate's name).

use serde_json::{Map, Value};

use super::QmpError;

/// A QAPI argument type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    Str,
    Bool,
    /// QAPI `int` / `int64`.
    Int,
    Int8,
    Int16,
    Int32,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    /// QAPI `size`: a `uint64` on the QMP wire.
    Size,
    /// QAPI `number`: any JSON number.
    Number,
    /// QAPI `any`: any JSON value, `null` included.
    Any,
    /// QAPI `null`, as a branch of an alternate.
    Null,
    Enum(&'static [&'static str]),
    Struct(&'static [Member]),
    List(&'static ArgType),
    /// A flat union. Unions and alternates may refer to each other (a
    /// `BlockdevOptions` holds `BlockdevRef`s holding `BlockdevOptions`), so
    /// they are `static`s reached by reference.
    Union(&'static Union),
    Alternate(&'static Alternate),
}

/// A QAPI flat union: base members, one of which (`tag`, an enum) selects the
/// variant whose members follow.
pub struct Union {
    pub base: &'static [Member],
    pub tag: &'static str,
    /// Members per tag value. A tag value without an entry is checked for its
    /// base members only; whoever executes the command refuses it.
    pub variants: &'static [(&'static str, &'static [Member])],
}

/// A QAPI alternate: the JSON type of a value picks one branch.
pub struct Alternate {
    /// The type's name, which QEMU's type errors show.
    pub name: &'static str,
    pub branches: &'static [ArgType],
}

// Unions and alternates are recursive: compare them by identity and print them
// by name, never by walking their members.
impl PartialEq for Union {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for Union {}
impl std::fmt::Debug for Union {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Union(tag: {})", self.tag)
    }
}
impl PartialEq for Alternate {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for Alternate {}
impl std::fmt::Debug for Alternate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Alternate({})", self.name)
    }
}

/// A struct member (or command argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub name: &'static str,
    pub ty: ArgType,
    pub optional: bool,
}

impl Member {
    pub const fn required(name: &'static str, ty: ArgType) -> Self {
        Self {
            name,
            ty,
            optional: false,
        }
    }

    pub const fn optional(name: &'static str, ty: ArgType) -> Self {
        Self {
            name,
            ty,
            optional: true,
        }
    }
}

/// Checks `args` against `members` as QEMU's generated marshaller would.
pub fn validate(args: &Map<String, Value>, members: &[Member]) -> Result<(), QmpError> {
    check_struct(args, members, "")
}

/// Checks the arguments of a command whose argument type is `ty`: a struct, or
/// a union for commands with `'boxed': true` (`blockdev-add`).
pub fn validate_args(args: &Map<String, Value>, ty: &ArgType) -> Result<(), QmpError> {
    match ty {
        ArgType::Struct(members) => check_struct(args, members, ""),
        ArgType::Union(u) => check_union(args, u, ""),
        other => check_value(&Value::Object(args.clone()), other, "", ""),
    }
}

/// Rewrites negative integers in `UInt64`/`Size` slots to the `u64` QEMU
/// reads them as. Call after [`validate`] succeeded.
pub fn normalize(args: &mut Map<String, Value>, members: &[Member]) {
    for m in members {
        if let Some(v) = args.get_mut(m.name) {
            normalize_value(v, &m.ty);
        }
    }
}

fn normalize_value(v: &mut Value, ty: &ArgType) {
    match (ty, v) {
        (ArgType::UInt64 | ArgType::Size, v) => {
            if let Some(n) = v.as_i64().filter(|n| *n < 0) {
                *v = Value::from(n as u64);
            }
        }
        (ArgType::Struct(members), Value::Object(map)) => normalize(map, members),
        (ArgType::Union(u), Value::Object(map)) => {
            normalize(map, u.base);
            let tag = map.get(u.tag).and_then(Value::as_str).map(str::to_owned);
            if let Some((_, members)) = u.variants.iter().find(|(n, _)| Some(*n) == tag.as_deref())
            {
                normalize(map, members);
            }
        }
        (ArgType::Alternate(a), v) => {
            if let Some(branch) = a.branches.iter().find(|b| json_type_matches(v, b)) {
                normalize_value(v, branch);
            }
        }
        (ArgType::List(elem), Value::Array(items)) => {
            for item in items {
                normalize_value(item, elem);
            }
        }
        _ => {}
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

fn check_struct(
    obj: &Map<String, Value>,
    members: &[Member],
    prefix: &str,
) -> Result<(), QmpError> {
    check_members(obj, members, prefix)?;
    unexpected(obj, &[members], prefix)
}

/// Checks the declared `members` of `obj`, in order.
fn check_members(
    obj: &Map<String, Value>,
    members: &[Member],
    prefix: &str,
) -> Result<(), QmpError> {
    for m in members {
        match obj.get(m.name) {
            Some(v) => check_value(v, &m.ty, &join(prefix, m.name), m.name)?,
            None if m.optional => {}
            None => {
                return Err(QmpError::generic(format!(
                    "Parameter '{}' is missing",
                    join(prefix, m.name)
                )));
            }
        }
    }
    Ok(())
}

/// The first member of `obj` that none of `sets` declares.
fn unexpected(obj: &Map<String, Value>, sets: &[&[Member]], prefix: &str) -> Result<(), QmpError> {
    match obj.keys().find(|k| {
        sets.iter()
            .all(|members| members.iter().all(|m| m.name != k.as_str()))
    }) {
        Some(k) => Err(QmpError::generic(format!(
            "Parameter '{}' is unexpected",
            join(prefix, k)
        ))),
        None => Ok(()),
    }
}

fn check_union(obj: &Map<String, Value>, u: &Union, prefix: &str) -> Result<(), QmpError> {
    check_members(obj, u.base, prefix)?;
    // The base members passed, so the tag is present and one of its enum's values.
    let tag = obj.get(u.tag).and_then(Value::as_str).unwrap_or_default();
    match u.variants.iter().find(|(name, _)| *name == tag) {
        Some((_, members)) => {
            check_members(obj, members, prefix)?;
            unexpected(obj, &[u.base, members], prefix)
        }
        None => Ok(()),
    }
}

/// Whether `v` has the JSON type of `ty`, for choosing an alternate's branch.
fn json_type_matches(v: &Value, ty: &ArgType) -> bool {
    match ty {
        ArgType::Any => true,
        ArgType::Str | ArgType::Enum(_) => v.is_string(),
        ArgType::Bool => v.is_boolean(),
        ArgType::Null => v.is_null(),
        ArgType::Struct(_) | ArgType::Union(_) => v.is_object(),
        ArgType::List(_) => v.is_array(),
        ArgType::Alternate(_) => false,
        ArgType::Int
        | ArgType::Int8
        | ArgType::Int16
        | ArgType::Int32
        | ArgType::UInt8
        | ArgType::UInt16
        | ArgType::UInt32
        | ArgType::UInt64
        | ArgType::Size
        | ArgType::Number => v.is_number(),
    }
}

/// `full` names the value in missing/type errors; `bare` in range and enum
/// errors (the member name, or "null" for a list element).
fn check_value(v: &Value, ty: &ArgType, full: &str, bare: &str) -> Result<(), QmpError> {
    let wrong_type = |expected: &str| {
        QmpError::generic(format!(
            "Invalid parameter type for '{full}', expected: {expected}"
        ))
    };
    let expects =
        |name: &str, what: &str| QmpError::generic(format!("Parameter '{name}' expects {what}"));
    let int = || v.as_i64().ok_or_else(|| wrong_type("integer"));
    // Negative integers wrap, as QEMU accepts them "for backward compatibility".
    let uint = || {
        v.as_u64()
            .or_else(|| v.as_i64().map(|n| n as u64))
            .ok_or_else(|| expects(full, "uint64"))
    };
    let ranged = |ok: bool, what: &str| if ok { Ok(()) } else { Err(expects(bare, what)) };
    match ty {
        ArgType::Any => Ok(()),
        ArgType::Str => v
            .is_string()
            .then_some(())
            .ok_or_else(|| wrong_type("string")),
        ArgType::Bool => v
            .is_boolean()
            .then_some(())
            .ok_or_else(|| wrong_type("boolean")),
        ArgType::Number => v
            .is_number()
            .then_some(())
            .ok_or_else(|| wrong_type("number")),
        ArgType::Null => v.is_null().then_some(()).ok_or_else(|| wrong_type("null")),
        ArgType::Union(u) => {
            let obj = v.as_object().ok_or_else(|| wrong_type("object"))?;
            check_union(obj, u, full)
        }
        ArgType::Alternate(a) => match a.branches.iter().find(|b| json_type_matches(v, b)) {
            Some(branch) => check_value(v, branch, full, bare),
            None => Err(wrong_type(a.name)),
        },
        ArgType::Int => int().map(drop),
        ArgType::Int8 => ranged(i8::try_from(int()?).is_ok(), "int8_t"),
        ArgType::Int16 => ranged(i16::try_from(int()?).is_ok(), "int16_t"),
        ArgType::Int32 => ranged(i32::try_from(int()?).is_ok(), "int32_t"),
        ArgType::UInt8 => ranged(u8::try_from(uint()?).is_ok(), "uint8_t"),
        ArgType::UInt16 => ranged(u16::try_from(uint()?).is_ok(), "uint16_t"),
        ArgType::UInt32 => ranged(u32::try_from(uint()?).is_ok(), "uint32_t"),
        ArgType::UInt64 | ArgType::Size => uint().map(drop),
        ArgType::Enum(values) => {
            let s = v.as_str().ok_or_else(|| wrong_type("string"))?;
            if values.contains(&s) {
                Ok(())
            } else {
                Err(QmpError::generic(format!(
                    "Parameter '{bare}' does not accept value '{s}'"
                )))
            }
        }
        ArgType::Struct(members) => {
            let obj = v.as_object().ok_or_else(|| wrong_type("object"))?;
            check_struct(obj, members, full)
        }
        ArgType::List(elem) => {
            let items = v.as_array().ok_or_else(|| wrong_type("array"))?;
            items
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| check_value(item, elem, &format!("{full}[{i}]"), "null"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ErrorClass;
    use super::*;
    use serde_json::json;

    fn check(args: Value, members: &[Member]) -> Result<(), String> {
        let Value::Object(args) = args else {
            panic!("not an object: {args}")
        };
        validate(&args, members).map_err(|e| {
            assert_eq!(e.class, ErrorClass::GenericError);
            e.desc
        })
    }

    fn fails(members: &[Member], cases: &[(Value, &str)]) {
        for (args, desc) in cases {
            assert_eq!(
                check(args.clone(), members),
                Err((*desc).to_owned()),
                "{args}"
            );
        }
    }

    const QMP_CAPABILITIES: &[Member] = &[Member::optional(
        "enable",
        ArgType::List(&ArgType::Enum(&["oob"])),
    )];

    #[test]
    fn qmp_capabilities_as_measured() {
        assert_eq!(check(json!({}), QMP_CAPABILITIES), Ok(()));
        assert_eq!(check(json!({"enable": []}), QMP_CAPABILITIES), Ok(()));
        assert_eq!(check(json!({"enable": ["oob"]}), QMP_CAPABILITIES), Ok(()));
        fails(
            QMP_CAPABILITIES,
            &[
                (
                    json!({"enable": "oob"}),
                    "Invalid parameter type for 'enable', expected: array",
                ),
                (
                    json!({"enable": null}),
                    "Invalid parameter type for 'enable', expected: array",
                ),
                (
                    json!({"enable": ["foo"]}),
                    "Parameter 'null' does not accept value 'foo'",
                ),
                (
                    json!({"enable": ["oob", 1]}),
                    "Invalid parameter type for 'enable[1]', expected: string",
                ),
                (json!({"x": 1}), "Parameter 'x' is unexpected"),
            ],
        );
        fails(&[], &[(json!({"x": 1}), "Parameter 'x' is unexpected")]);
        assert_eq!(check(json!({}), &[]), Ok(()));
    }

    const SET_SPEED: &[Member] = &[
        Member::required("device", ArgType::Str),
        Member::required("speed", ArgType::Int),
    ];

    #[test]
    fn schema_order_first_error_wins() {
        fails(
            SET_SPEED,
            &[
                (json!({"speed": "x"}), "Parameter 'device' is missing"),
                (
                    json!({"device": "d", "speed": 1.0}),
                    "Invalid parameter type for 'speed', expected: integer",
                ),
                (
                    json!({"device": "d", "speed": u64::MAX}),
                    "Invalid parameter type for 'speed', expected: integer",
                ),
                (
                    json!({"bogus": 1, "device": "d", "speed": null}),
                    "Invalid parameter type for 'speed', expected: integer",
                ),
                (
                    json!({"b": 1, "a": 2, "device": "d", "speed": 1}),
                    "Parameter 'b' is unexpected",
                ),
                (
                    json!({"device": 1}),
                    "Invalid parameter type for 'device', expected: string",
                ),
            ],
        );
        assert_eq!(
            check(json!({"speed": -5, "device": "d"}), SET_SPEED),
            Ok(())
        );
    }

    const UNIX: &[Member] = &[Member::required("path", ArgType::Str)];
    const ADDR: &[Member] = &[
        Member::required("type", ArgType::Enum(&["inet", "unix"])),
        Member::required("data", ArgType::Struct(UNIX)),
    ];
    /// nbd-server-start as QEMU 10 visits it (base members first).
    const NBD_SERVER_START: &[Member] = &[
        Member::optional("tls-creds", ArgType::Str),
        Member::optional("tls-authz", ArgType::Str),
        Member::optional("max-connections", ArgType::UInt32),
        Member::required("addr", ArgType::Struct(ADDR)),
    ];

    #[test]
    fn nested_names_as_measured() {
        let addr = |data: Value| json!({"type": "unix", "data": data});
        fails(
            NBD_SERVER_START,
            &[
                (
                    json!({"addr": addr(json!({"path": 1}))}),
                    "Invalid parameter type for 'addr.data.path', expected: string",
                ),
                (
                    json!({"addr": addr(json!({"zz": 1}))}),
                    "Parameter 'addr.data.path' is missing",
                ),
                (
                    json!({"addr": addr(json!({"path": "/p", "zz": 1}))}),
                    "Parameter 'addr.data.zz' is unexpected",
                ),
                (
                    json!({"addr": addr(json!({"path": "/p", "zz": 1})), "max-connections": -1}),
                    "Parameter 'max-connections' expects uint32_t",
                ),
                (
                    json!({"addr": addr(json!({"path": "/p"})), "max-connections": "x"}),
                    "Parameter 'max-connections' expects uint64",
                ),
                (
                    json!({"addr": addr(json!({"path": "/p"})), "max-connections": 1.0}),
                    "Parameter 'max-connections' expects uint64",
                ),
                (
                    json!({"addr": addr(json!({"path": "/p"})), "max-connections": 4_294_967_296_u64}),
                    "Parameter 'max-connections' expects uint32_t",
                ),
                (
                    json!({"addr": addr(json!({"path": "/p"})), "tls-creds": null}),
                    "Invalid parameter type for 'tls-creds', expected: string",
                ),
                // Enum and range errors name the bare member, as QEMU does.
                (
                    json!({"addr": {"type": "bogus", "data": {"path": "/p"}}}),
                    "Parameter 'type' does not accept value 'bogus'",
                ),
                (
                    json!({"addr": "x"}),
                    "Invalid parameter type for 'addr', expected: object",
                ),
            ],
        );
        let ok = json!({"addr": addr(json!({"path": "/p"})), "max-connections": 4_294_967_295_u64});
        assert_eq!(check(ok, NBD_SERVER_START), Ok(()));
    }

    const INNER: &[Member] = &[Member::required("x", ArgType::Int)];
    const ITEM: &[Member] = &[
        Member::required("path", ArgType::Str),
        Member::optional("n", ArgType::UInt16),
    ];
    const NESTED: &[Member] = &[
        Member::required("a", ArgType::Struct(INNER)),
        Member::required("b", ArgType::Int),
        Member::optional("items", ArgType::List(&ArgType::Struct(ITEM))),
        Member::optional("grid", ArgType::List(&ArgType::List(&ArgType::UInt32))),
    ];

    #[test]
    fn unexpected_members_after_declared_ones_per_struct() {
        fails(
            NESTED,
            &[
                // The nested struct is checked completely before 'b'.
                (
                    json!({"a": {"x": 1, "zz": 1}}),
                    "Parameter 'a.zz' is unexpected",
                ),
                (json!({"zz": 1, "a": {"x": 1}}), "Parameter 'b' is missing"),
                (json!({"a": {}, "b": 1}), "Parameter 'a.x' is missing"),
                (
                    json!({"a": {"x": 1}, "b": 1, "items": [{"path": "p"}, {}]}),
                    "Parameter 'items[1].path' is missing",
                ),
                (
                    json!({"a": {"x": 1}, "b": 1, "items": [{"path": "p", "q": 1}]}),
                    "Parameter 'items[0].q' is unexpected",
                ),
                (
                    json!({"a": {"x": 1}, "b": 1, "items": [{"path": "p", "n": 65536}]}),
                    "Parameter 'n' expects uint16_t",
                ),
                (
                    json!({"a": {"x": 1}, "b": 1, "items": [7]}),
                    "Invalid parameter type for 'items[0]', expected: object",
                ),
                (
                    json!({"a": {"x": 1}, "b": 1, "grid": [[1], [2, "x"]]}),
                    "Parameter 'grid[1][1]' expects uint64",
                ),
                (
                    json!({"a": {"x": 1}, "b": 1, "grid": [[1, 4_294_967_296_u64]]}),
                    "Parameter 'null' expects uint32_t",
                ),
            ],
        );
    }

    #[test]
    fn scalar_types() {
        let one = |ty: ArgType, v: Value| check(json!({"v": v}), &[Member::required("v", ty)]);
        let bad = |ty: ArgType, v: Value, desc: &str| {
            assert_eq!(one(ty, v.clone()), Err(desc.into()), "{ty:?} {v}")
        };
        let ok = |ty: ArgType, v: Value| assert_eq!(one(ty, v.clone()), Ok(()), "{ty:?} {v}");
        let ty_err = |t: &str| format!("Invalid parameter type for 'v', expected: {t}");
        for (ty, lo, hi, name) in [
            (ArgType::Int8, -128_i64, 127_i64, "int8_t"),
            (ArgType::Int16, -32768, 32767, "int16_t"),
            (ArgType::Int32, -2_147_483_648, 2_147_483_647, "int32_t"),
        ] {
            ok(ty, json!(lo));
            ok(ty, json!(hi));
            bad(ty, json!(lo - 1), &format!("Parameter 'v' expects {name}"));
            bad(ty, json!(hi + 1), &format!("Parameter 'v' expects {name}"));
            bad(ty, json!("1"), &ty_err("integer"));
            bad(ty, json!(1.0), &ty_err("integer"));
        }
        for (ty, hi, name) in [
            (ArgType::UInt8, 255_i64, "uint8_t"),
            (ArgType::UInt16, 65535, "uint16_t"),
            (ArgType::UInt32, 4_294_967_295, "uint32_t"),
        ] {
            ok(ty, json!(0));
            ok(ty, json!(hi));
            bad(ty, json!(hi + 1), &format!("Parameter 'v' expects {name}"));
            bad(ty, json!(-1), &format!("Parameter 'v' expects {name}"));
            bad(ty, json!(true), "Parameter 'v' expects uint64");
        }
        for ty in [ArgType::UInt64, ArgType::Size] {
            ok(ty, json!(u64::MAX));
            ok(ty, json!(-1));
            ok(ty, json!(i64::MIN));
            bad(ty, json!(1.5), "Parameter 'v' expects uint64");
            bad(
                ty,
                json!(18_446_744_073_709_551_616.0),
                "Parameter 'v' expects uint64",
            );
            bad(ty, json!("1"), "Parameter 'v' expects uint64");
            bad(ty, Value::Null, "Parameter 'v' expects uint64");
        }
        ok(ArgType::Int, json!(i64::MIN));
        bad(ArgType::Int, json!(1.5), &ty_err("integer"));
        for v in [json!(1), json!(-1.5), json!(u64::MAX)] {
            ok(ArgType::Number, v);
        }
        bad(ArgType::Number, json!("1"), &ty_err("number"));
        ok(ArgType::Bool, json!(false));
        bad(ArgType::Bool, json!("true"), &ty_err("boolean"));
        bad(ArgType::Bool, json!(0), &ty_err("boolean"));
        ok(ArgType::Str, json!(""));
        bad(ArgType::Str, json!([]), &ty_err("string"));
        bad(ArgType::Enum(&["a"]), json!(1), &ty_err("string"));
        bad(
            ArgType::Enum(&["a"]),
            json!("A"),
            "Parameter 'v' does not accept value 'A'",
        );
        for v in [Value::Null, json!({"deep": [1]}), json!("s")] {
            ok(ArgType::Any, v);
        }
        bad(ArgType::List(&ArgType::Any), json!({}), &ty_err("array"));
        // Optional members are still type-checked when present, even as null.
        let opt = [Member::optional("v", ArgType::Int)];
        assert_eq!(check(json!({"v": null}), &opt), Err(ty_err("integer")));
        let any = [Member::optional("v", ArgType::Any)];
        assert_eq!(check(json!({"v": null}), &any), Ok(()));
    }

    #[test]
    fn normalize_wraps_negative_uint64_for_serde() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Args {
            size: u64,
            speed: i64,
            items: Vec<Item>,
        }
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Item {
            granularity: Option<u64>,
        }
        const ITEM: &[Member] = &[Member::optional("granularity", ArgType::Size)];
        const ARGS: &[Member] = &[
            Member::required("size", ArgType::UInt64),
            Member::required("speed", ArgType::Int),
            Member::required("items", ArgType::List(&ArgType::Struct(ITEM))),
        ];
        let Value::Object(mut args) =
            json!({"size": -1, "speed": -1, "items": [{"granularity": -2}, {}]})
        else {
            panic!()
        };
        assert_eq!(validate(&args, ARGS), Ok(()));
        normalize(&mut args, ARGS);
        let parsed: Result<Args, _> = serde_json::from_value(Value::Object(args));
        assert_eq!(
            parsed.ok(),
            Some(Args {
                size: u64::MAX,
                speed: -1,
                items: vec![
                    Item {
                        granularity: Some(u64::MAX - 1)
                    },
                    Item { granularity: None }
                ],
            })
        );
    }
}
