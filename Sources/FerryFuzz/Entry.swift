import Foundation

// Two builds of one target. The normal build (`swift build`) replays files through the
// harness and writes the seed corpus. The fuzz build (scripts/fuzz.sh: -sanitize=fuzzer
// -DFERRY_LIBFUZZER) writes the seeds too and otherwise hands the harness to libFuzzer.
//
// libFuzzer brings a `main`, but SwiftPM links every executable on Linux with `main`
// defined as `ferry_fuzz_main` (so that tests can link executables), which the target must
// then define itself: so both builds keep `@main`, and in the fuzz build it calls
// libFuzzer's driver. (Hence no -parse-as-library either: `@main` outside main.swift.)

@main
enum FerryFuzzCommand {
    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        if arguments.first == "--write-seeds" { exit(CommandLine.writeSeeds(Array(arguments.dropFirst()))) }
        #if FERRY_LIBFUZZER
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv, fuzzerTestOneInput))
        #else
        if arguments.isEmpty || arguments.first == "--help" || arguments.first == "-h" {
            CommandLine.printError(CommandLine.usage)
            exit(arguments.isEmpty ? 2 : 0)
        }
        exit(CommandLine.replay(arguments))
        #endif
    }
}

#if FERRY_LIBFUZZER

/// libFuzzer's callback, under the name its own `main` looks for too.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzerTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    fuzzOne(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

/// libFuzzer's driver (compiler-rt FuzzerDriver.cpp, extern "C"): parses libFuzzer's flags
/// from argv and fuzzes `callback`. Declared here because FerryFuzz has no C module; the
/// arguments are pointers and the result an int, passed alike by Swift and C.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>,
                         _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

#endif

extension CommandLine {
    static let usage = """
        usage: ferry-fuzz FILE|DIR...        run the fuzz harness on each file (a crash reproduces)
               ferry-fuzz --write-seeds DIR  write the seed corpus into DIR
        The fuzz build (scripts/fuzz.sh) takes libFuzzer's flags instead, and --write-seeds.
        """

    static func printError(_ text: String) {
        FileHandle.standardError.write(Data((text + "\n").utf8))
    }

    static func writeSeeds(_ arguments: [String]) -> Int32 {
        guard arguments.count == 1 else {
            printError("ferry-fuzz: --write-seeds takes one directory\n" + usage)
            return 2
        }
        do {
            let count = try Seeds.write(to: arguments[0])
            print("ferry-fuzz: wrote \(count) seeds to \(arguments[0])")
            return 0
        } catch {
            printError("ferry-fuzz: cannot write seeds to \(arguments[0]): \(error)")
            return 1
        }
    }

    /// Runs the harness on every file named, and every file in every directory named.
    static func replay(_ paths: [String]) -> Int32 {
        let files = FileManager.default
        var count = 0
        for path in paths {
            var isDirectory: ObjCBool = false
            guard files.fileExists(atPath: path, isDirectory: &isDirectory) else {
                printError("ferry-fuzz: \(path) does not exist")
                return 1
            }
            let inputs = isDirectory.boolValue
                ? ((try? files.contentsOfDirectory(atPath: path)) ?? []).sorted().map { path + "/" + $0 }
                : [path]
            for input in inputs {
                guard let data = files.contents(atPath: input) else {
                    printError("ferry-fuzz: cannot read \(input)")
                    return 1
                }
                // Named first, so that the last name printed is the input that crashed.
                printError("ferry-fuzz: running \(input) (\(data.count) bytes)")
                data.withUnsafeBytes { fuzzOne($0) }
                count += 1
            }
        }
        print("ferry-fuzz: \(count) inputs ran without a crash")
        return 0
    }
}
