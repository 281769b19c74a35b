// A Node client built from protos/ alone, as a team in another language would: no generated
// code, no extra include paths (the contract imports only well-known types). Streams one
// response and prints every chunk as a JSON line, then the status, for the Python test to check.
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { fileURLToPath } from "node:url";
import path from "node:path";

const [address, model = "sim"] = process.argv.slice(2);
const root = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");
const definition = protoLoader.loadSync("tokenwire/v1/generation.proto", {
  includeDirs: [root],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: false,
  oneofs: true,
});
const { tokenwire } = grpc.loadPackageDefinition(definition);
const client = new tokenwire.v1.GenerationService(address, grpc.credentials.createInsecure());

const call = client.Generate({
  model,
  messages: [{ role: "ROLE_USER", text: "Hello from Node 👋" }],
  max_output_tokens: 5,
});
call.on("data", (chunk) => console.log(JSON.stringify(chunk)));
call.on("error", (err) => {
  console.log(JSON.stringify({ status: grpc.status[err.code], details: err.details }));
  client.close();
});
call.on("end", () => {});
call.on("status", (status) => {
  if (status.code === grpc.status.OK) {
    console.log(JSON.stringify({ status: "OK" }));
    client.close();
  }
});
