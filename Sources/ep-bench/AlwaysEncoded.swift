/// An optional that the JSON always carries, as `null` when absent, so that readers may rely on
/// the key (synthesized Codable leaves nil optionals out). A missing key decodes as nil.
@propertyWrapper
struct AlwaysEncoded<Value: Codable & Sendable>: Codable, Sendable {
    var wrappedValue: Value?

    init(wrappedValue: Value?) { self.wrappedValue = wrappedValue }

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        wrappedValue = container.decodeNil() ? nil : try container.decode(Value.self)
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        if let wrappedValue { try container.encode(wrappedValue) } else { try container.encodeNil() }
    }
}

extension KeyedDecodingContainer {
    func decode<Value>(_ type: AlwaysEncoded<Value>.Type, forKey key: Key) throws -> AlwaysEncoded<Value> {
        try decodeIfPresent(type, forKey: key) ?? AlwaysEncoded(wrappedValue: nil)
    }
}
